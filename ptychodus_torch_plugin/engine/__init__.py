"""Pure torch + numpy engine: configs, data, grouping, physics, model, training, inference."""
