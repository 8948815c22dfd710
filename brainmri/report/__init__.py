"""The report's parts: figures and the Markdown tables' names."""
