// logq.js: the framing of the logq:reducer WIT world, so reducer.js deals in plain
// events and states. `reducer(rules)` returns the `fold` export.
//
// rules.entity(event, where)  -> { kind: "user" | "organization", key } or throw an
//                                Error whose message is the reason (dead letter)
// rules.apply(state, event, where) -> the new state (any JSON value), or null to
//                                forget the entity; throw to refuse (the host folds
//                                the batch record by record and dead-letters this one)
// rules.answer(state, entity) -> the object GET answers, or null for a 404
// rules.join(state, entity)   -> for a user: the organization_name it joins; for an
//                                organization: its own (or null)
// `entity` is { kind: "user" | "organization", key }.
// `where` is { source: "users" | "organizations", partition, offset, index }.
//
// A state crosses the boundary as: u32 length + the state's JSON, the answer's JSON,
// the join key (u32 little-endian; the answer and join are ranges inside it).

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const KINDS = ["user", "organization"];

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.at = 0;
  }
  more() {
    return this.at < this.bytes.length;
  }
  u8() {
    return this.bytes[this.at++];
  }
  u32() {
    const n = this.view.getUint32(this.at, true);
    this.at += 4;
    return n;
  }
  i32() {
    const n = this.view.getInt32(this.at, true);
    this.at += 4;
    return n;
  }
  i64() {
    const n = this.view.getBigInt64(this.at, true);
    this.at += 8;
    return n;
  }
  frame() {
    const n = this.u32();
    const out = this.bytes.subarray(this.at, this.at + n);
    this.at += n;
    return out;
  }
}

class Writer {
  constructor() {
    this.chunks = [];
    this.length = 0;
  }
  bytes(b) {
    this.chunks.push(b);
    this.length += b.length;
  }
  u8(n) {
    this.bytes(Uint8Array.of(n));
  }
  u32(n) {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, n, true);
    this.bytes(b);
  }
  frame(b) {
    this.u32(b.length);
    this.bytes(b);
  }
  finish() {
    const out = new Uint8Array(this.length);
    let at = 0;
    for (const c of this.chunks) {
      out.set(c, at);
      at += c.length;
    }
    return out;
  }
}

function encodeState(rules, state, entity) {
  const json = encoder.encode(JSON.stringify(state));
  const answer = rules.answer(state, entity);
  const view = answer === null || answer === undefined ? null : encoder.encode(JSON.stringify(answer));
  const joinKey = rules.join ? rules.join(state, entity) : null;
  const join = joinKey === null || joinKey === undefined ? null : encoder.encode(String(joinKey));
  const w = new Writer();
  w.frame(json);
  const viewAt = w.length;
  if (view) w.bytes(view);
  const joinAt = w.length;
  if (join) w.bytes(join);
  return { bytes: w.finish(), view: view && [viewAt, view.length], join: join && [joinAt, join.length] };
}

function decodeState(bytes) {
  return JSON.parse(decoder.decode(new Reader(bytes).frame()));
}

export function reducer(rules) {
  class Batch {
    constructor(records) {
      const r = new Reader(records);
      this.entities = [];
      this.events = [];
      this.rejections = [];
      this.accepted = [];
      const seen = new Map();
      for (let input = 0; r.more(); input++) {
        const source = r.u8() === 0 ? "users" : "organizations";
        const partition = r.i32();
        const offset = Number(r.i64());
        const value = r.frame();
        let accepted = 0;
        let items;
        try {
          const parsed = JSON.parse(decoder.decode(value));
          items = Array.isArray(parsed) ? parsed : [parsed];
        } catch (e) {
          this.rejections.push({ input, event: undefined, reason: `invalid JSON: ${e.message}` });
          this.accepted.push(0);
          continue;
        }
        items.forEach((event, index) => {
          const where = { source, partition, offset, index };
          try {
            if (event === null || typeof event !== "object" || Array.isArray(event)) {
              throw new Error("not a JSON object");
            }
            const { kind, key } = rules.entity(event, where);
            const k = KINDS.indexOf(kind);
            if (k < 0) throw new Error(`entity kind ${kind}: use "user" or "organization"`);
            const id = `${k}:${key}`;
            let at = seen.get(id);
            if (at === undefined) {
              at = this.entities.length;
              seen.set(id, at);
              this.entities.push({ kind: k, key: String(key) });
            }
            this.events.push({ at, event, where });
            accepted++;
          } catch (e) {
            this.rejections.push({ input, event: index, reason: e.message || String(e) });
          }
        });
        this.accepted.push(accepted);
      }
    }

    plan() {
      const w = new Writer();
      for (const e of this.entities) {
        w.u8(e.kind);
        w.frame(encoder.encode(e.key));
      }
      return {
        entities: w.finish(),
        entityCount: this.entities.length,
        rejections: this.rejections,
        accepted: Uint32Array.from(this.accepted),
      };
    }

    fold(prior) {
      const r = new Reader(prior);
      const states = this.entities.map(() => (r.u8() === 1 ? decodeState(r.frame()) : null));
      for (const { at, event, where } of this.events) {
        states[at] = rules.apply(states[at], event, where);
      }
      const w = new Writer();
      states.forEach((state, at) => {
        if (state === null || state === undefined) {
          w.u8(0); // forget it
          return;
        }
        const { kind, key } = this.entities[at];
        const s = encodeState(rules, state, { kind: KINDS[kind], key });
        w.u8(1 | (s.view ? 2 : 0) | (s.join ? 4 : 0));
        w.frame(s.bytes);
        for (const range of [s.view, s.join]) {
          if (range) {
            w.u32(range[0]);
            w.u32(range[1]);
          }
        }
      });
      return w.finish();
    }
  }
  return { Batch };
}
