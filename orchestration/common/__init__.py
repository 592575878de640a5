"""Small helpers every package uses: the project's paths and atomic file writes."""
