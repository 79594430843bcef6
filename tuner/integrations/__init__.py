"""Apply a plan to a training framework: Hugging Face `Trainer` (`tuner.integrations.hf`) and
PyTorch Lightning (`tuner.integrations.lightning`). Each module imports its framework only when
one of its functions is called, so importing them is safe where the framework is absent."""
