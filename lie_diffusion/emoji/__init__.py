"""A small, real, pretrained Stable Diffusion pipeline on colour emoji, its data set and its judge."""
