#!/usr/bin/env python3
"""Writes a reproducible user-event history as JSON lines: gen_events.py SEED USERS EVENTS."""
import json, random, sys

seed, users, events = (int(a) for a in sys.argv[1:4])
rng = random.Random(seed)
names = ["Metal Gear Solid", "Outer Heaven", "FOXHOUND", "Philanthropy"]
for _ in range(events):
    uid = f"{rng.randrange(users) * 0x9E3779B97F4A7C15 % (1 << 128):032x}"
    kind = rng.choices(["User Created", "User Updated", "User Deleted"], [4, 5, 1])[0]
    e = {"id": uid, "event_type": kind,
         "received_at": f"2021-{rng.randint(1,12):02}-{rng.randint(1,28):02} "
                        f"{rng.randrange(24):02}:{rng.randrange(60):02}:{rng.randrange(60):02}.{rng.randrange(10**6):06}"}
    if kind != "User Deleted":
        n = rng.randrange(100000)
        e.update(username=f"user-{n}", user_email=f"user-{n}@example.com",
                 user_type=rng.choice(["Admin", "User"]), organization_name=rng.choice(names))
    print(json.dumps(e))
