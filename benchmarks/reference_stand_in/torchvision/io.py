"""`torchvision.io`, benchmark-only stand-in: present because transformers' `video_utils` imports it; empty."""
