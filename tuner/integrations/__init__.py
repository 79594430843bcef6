"""Apply a plan to a training framework: Hugging Face `Trainer` (`tuner.integrations.hf`, with the
`TrainingArguments` keywords a plan sets in `tuner.integrations.hf_arguments`) and PyTorch
Lightning (`tuner.integrations.lightning`); and the code that applies a plan, as the plan page
shows it for pasting (`tuner.integrations.snippets`). Each module imports its framework only when
one of its functions is called, so importing them is safe where the framework is absent."""
