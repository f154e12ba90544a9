"""The sparse autoencoder: its maths and folder format, how each architecture trains, and the train stages."""
