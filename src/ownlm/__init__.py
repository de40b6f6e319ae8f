"""ownlm: your conversations become your personal language model, on your machine.

Read the stage modules in loop order: capture → store → dataset → train → bitdelta → artifact → node → serve.
"""

__version__ = "0.1.0"
