"""Personal model artifacts: manifest, signature, sealed bundle (see DESIGN.md, "Formats" and "Cryptography")."""
