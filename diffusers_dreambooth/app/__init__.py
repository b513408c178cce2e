"""The web app: `python -m diffusers_dreambooth.app` (needs `pip install -e ".[app]"`)."""
