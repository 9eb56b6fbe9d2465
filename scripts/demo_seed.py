"""Demo data: users in Postgres (demo_users), profiles in DynamoDB (DemoProfiles). Idempotent."""

import asyncio
import os

import asyncpg
from aiobotocore.session import get_session

DSN = "postgresql://postgres@127.0.0.1:5432/test"
DDB = f"http://127.0.0.1:{os.environ.get('DEMO_DDB_PORT', '8001')}"


async def seed_postgres() -> None:
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute("""
            CREATE TABLE IF NOT EXISTS demo_users (id bigint PRIMARY KEY, name text NOT NULL, email text);
            INSERT INTO demo_users
              SELECT i, 'User ' || i, 'user' || i || '@example.com' FROM generate_series(1, 100) AS i
            ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email;
            DELETE FROM demo_users WHERE id > 100;
        """)
    finally:
        await conn.close()


async def seed_dynamodb() -> None:
    async with get_session().create_client("dynamodb", region_name="us-east-1", endpoint_url=DDB) as ddb:
        tables = (await ddb.list_tables())["TableNames"]
        if "DemoProfiles" not in tables:
            await ddb.create_table(
                TableName="DemoProfiles", BillingMode="PAY_PER_REQUEST",
                KeySchema=[{"AttributeName": "UserId", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "UserId", "AttributeType": "S"}])
        for i in range(1, 21):
            await ddb.put_item(TableName="DemoProfiles", Item={
                "UserId": {"S": f"u{i}"}, "Plan": {"S": "pro" if i % 3 == 0 else "free"},
                "Logins": {"N": str(i * 7)}, "Tags": {"SS": ["demo", f"cohort-{i % 4}"]}})


async def main() -> None:
    await seed_postgres()
    await seed_dynamodb()
    print("demo data ready: 100 users in Postgres (demo_users), 20 profiles in DynamoDB (DemoProfiles)")


asyncio.run(main())
