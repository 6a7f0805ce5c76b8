"""Other libraries' checkpoint formats, out and in (`saelens`)."""
