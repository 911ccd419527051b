"""The node's side of teardown: wipe what a job left on this host (guest RAM, VRAM) and prove it."""
