"""Stage 5 (data): read and check rows, render them with the chat template, mask prompts, batch."""
