"""Views of a scan: console (rich), markdown, JSON, HTML and plots. Computing stays elsewhere."""
