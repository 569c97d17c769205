"""media-server-home: build, boot, verify and deploy the homelab's VM images."""

__version__ = "0.1.0"
