"""Code shared by hospital sites and the coordinating server: what crosses the network."""
