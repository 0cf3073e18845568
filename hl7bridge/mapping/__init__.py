"""From an appointment event to commands: route choice and journey parameters (pure)."""
