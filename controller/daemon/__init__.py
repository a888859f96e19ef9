"""The service: its assembly (service.py) and what runs in the background of one replica."""
