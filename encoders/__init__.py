"""Image-side modules: the tiled ViT encoder and the image transform."""
