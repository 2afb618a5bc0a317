"""The data model, imported by every other layer and importing none of them: errors, canonical
JSON and hashing, safe file access, the manifest and its schemas, the workspace lock, optional
libraries, and the rule that turns an environment failure into one sentence."""
