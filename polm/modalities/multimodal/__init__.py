"""What every modality shares: a language model joined to encoders through connectors, its folder, its tasks."""
