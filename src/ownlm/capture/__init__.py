"""Capture: conversations enter ownlm here, live (api/) or from exports of other tools (importers/)."""
