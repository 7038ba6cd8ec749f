"""Drop-in front doors: other providers' HTTP APIs translated onto the one service path."""
