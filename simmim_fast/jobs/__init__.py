"""The training jobs: what pretraining and fine-tuning each add to the engine's run assembly."""
