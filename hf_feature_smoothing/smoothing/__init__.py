"""L2, the smoothing core: `FeatureSmoothingConfig`, seeded noise, the noise-conditioning protocol, the tower families
(one module per family behind a registry, with their processor statistics) and `SmoothedVisionTower`. It imports
only `utils/` and `statistics/`; Hub I/O and boosters sit above it and register with it."""
