"""Model card templates, shipped inside the package as `diffusers_dreambooth.model_cards`."""
