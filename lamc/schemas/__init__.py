"""JSON Schemas shipped with lamc (the manifest schema)."""
