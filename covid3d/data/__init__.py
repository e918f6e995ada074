"""covid3d.data."""
