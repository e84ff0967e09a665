"""Container images: the model, references, transports and layer streams."""
