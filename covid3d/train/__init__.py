"""covid3d.train."""
