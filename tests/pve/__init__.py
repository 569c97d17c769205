"""A stateful Proxmox VE 8.4 API emulator (HTTPS on loopback) for testing the deploy client without Proxmox."""
