"""The block layer: node graph, generic request path, drivers and image creation."""
