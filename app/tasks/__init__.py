"""Pure task logic: prompts in, parsed results out. No torch, no HTTP."""
