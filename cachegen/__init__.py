"""cachegen: expand an image dataset into N augmented epochs of WebDataset shards."""

__version__ = "0.1.0"
