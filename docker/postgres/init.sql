-- Run once by the postgres image on an empty data directory: one database per schema owner
-- (DESIGN §5), since Optuna and MLflow each keep their own alembic_version table.
CREATE DATABASE optuna;
CREATE DATABASE mlflow;
CREATE DATABASE hpo;
