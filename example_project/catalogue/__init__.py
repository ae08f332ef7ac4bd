"""The catalogue app: models, the data generator, and the dashboard shown three ways."""
