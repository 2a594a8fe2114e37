"""Medical image decoding, corpus preparation and the Grain input pipeline."""
