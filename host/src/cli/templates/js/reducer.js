// {{name}}: a logq reducer in JavaScript. logq.js does the framing; these are the
// rules. Build and check: `logq reducer build` (writes reducer.wasm).
//
// The rules here, simple on purpose:
// - users are keyed by `id`, organizations by `organization_key`;
// - an event counts only if it is not older than the last one that counted (by
//   `received_at` / `created_at`, then by its place in the log): its members are
//   merged in; "User Deleted" hides the user until a later "User Created";
// - a user's answer is its members (without `event_type`); it joins its
//   organization by `organization_name`.
import { reducer } from "./logq.js";

// Event times as text sort like the times they name ("2021-01-01 00:00:00").
const newer = (a, b) =>
  a.at !== b.at ? a.at > b.at : a.partition !== b.partition ? a.partition > b.partition : a.offset >= b.offset;

export const fold = reducer({
  entity(event, where) {
    if (where.source === "users") {
      if (typeof event.id !== "string") throw new Error("missing field `id`");
      return { kind: "user", key: event.id };
    }
    if (typeof event.organization_key !== "string") throw new Error("missing field `organization_key`");
    return { kind: "organization", key: event.organization_key };
  },

  apply(state, event, where) {
    const at = String(event.received_at ?? event.created_at ?? "");
    const stamp = { at, partition: where.partition, offset: where.offset };
    if (state && !newer(stamp, state.stamp)) return state;
    const { event_type, ...members } = event;
    const deleted = event_type === "User Deleted";
    return { stamp, deleted, members: deleted ? state?.members ?? {} : { ...(state?.members ?? {}), ...members } };
  },

  // What GET answers: change it here.
  answer(state, entity) {
    if (state.deleted) return null;
    const { received_at, ...answer } = state.members;
    return answer;
  },

  join(state) {
    return state.members.organization_name ?? null;
  },
});
