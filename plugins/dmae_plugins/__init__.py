"""First-party plugins of dmae, registered through the same entry points as third-party ones."""
