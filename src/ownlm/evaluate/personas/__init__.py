"""Persona fixtures: cast (three fictional users as data), templates (what they ask and how a personal answer
reads), fixtures (generate their chats, their unseen probes, and check an answer)."""
