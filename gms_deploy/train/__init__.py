"""Training for GMS: synthetic phantoms, the official data layout, the GMS objective, the mapper
and stand-in VAE trainers, and the recipe that reproduces the shipped demo model."""
