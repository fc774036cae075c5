"""Use cases: one folder per model, holding what is specific to it (issue 15 moves the fraud
demo's declarations here step by step; the platform packages are to import none by name)."""
