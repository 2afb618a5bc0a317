"""The application: recipes, ``curate build``, the demo and the command line."""
