"""The report's parts: one module per section (each reads its own files and draws its own figures), the figures, and
the Markdown and HTML rendering."""
