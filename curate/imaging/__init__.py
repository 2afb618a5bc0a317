"""Pixels: decoding and encoding images, image statistics, masks from every annotation kind,
perceptual hashes and the Hamming-radius search. numpy, OpenCV and Pillow only; of curate,
only the core."""
