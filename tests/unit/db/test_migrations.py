"""The models and the migrations describe the same schema."""
import alembic.autogenerate
import alembic.migration
import sqlalchemy

from vmcloud.db import api as db_api
from vmcloud.db import models
from tests import base


class MigrationsTest(base.TestCase):
    def test_the_migrated_schema_is_the_models(self):
        self.conf.set_override('connection', f'sqlite:///{self.tmp}/fresh.sqlite', 'database')
        db = db_api.Database(self.conf)
        self.addCleanup(db.dispose)
        db.upgrade()
        with db.engine.connect() as connection:
            context = alembic.migration.MigrationContext.configure(
                connection, opts={'compare_type': True, 'compare_server_default': True})
            differences = alembic.autogenerate.compare_metadata(context, models.Base.metadata)
        self.assertEqual([], differences)

    def test_a_difference_is_seen(self):
        # The check itself: a column the migrations do not create is reported.
        self.conf.set_override('connection', f'sqlite:///{self.tmp}/fresh.sqlite', 'database')
        db = db_api.Database(self.conf)
        self.addCleanup(db.dispose)
        db.upgrade()
        metadata = sqlalchemy.MetaData()
        for table in models.Base.metadata.tables.values():
            table.to_metadata(metadata)
        metadata.tables['hosts'].append_column(sqlalchemy.Column('extra', sqlalchemy.Integer))
        with db.engine.connect() as connection:
            context = alembic.migration.MigrationContext.configure(connection)
            differences = alembic.autogenerate.compare_metadata(context, metadata)
        self.assertEqual([('add_column', None, 'hosts', 'extra')],
                         [(d[0], d[1], d[2], d[3].name) for d in differences])
