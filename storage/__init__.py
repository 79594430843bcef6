"""SQL storage: models, repository functions, migrations."""
