"""The foreground stage: classical thresholding, or IS-Net (DIS) in the authors' layout."""
