"""covid3d.stages."""
