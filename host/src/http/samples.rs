//! The status page's samples as the handlers share them: the latest one, the recent
//! chart points, and the broadcast to open streams. A leaf of `http/`: the sampler and
//! the routes ([`super::status`]) write and read it through [`super::Api`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::broadcast;

/// Chart points kept for a page that opens: five minutes.
const KEEP_POINTS: usize = 300;

/// The samples the page shows: the latest whole one, and the recent chart points.
pub struct StatusFeed {
    /// The dead-letter topic of each consumed topic, users first.
    dead_letter_topics: [String; 2],
    latest: Mutex<Option<Arc<str>>>,
    points: Mutex<VecDeque<Value>>,
    /// `None` once closed: the open streams end.
    tx: Mutex<Option<broadcast::Sender<Arc<str>>>>,
}

impl StatusFeed {
    /// A feed for a host whose dead-letter topics are `dead_letter_topics` (users
    /// first).
    pub fn new(dead_letter_topics: [String; 2]) -> Self {
        Self {
            dead_letter_topics,
            latest: Mutex::new(None),
            points: Mutex::new(VecDeque::with_capacity(KEEP_POINTS)),
            tx: Mutex::new(Some(broadcast::channel(16).0)),
        }
    }

    /// Ends every open stream (at shutdown, so open pages do not hold the drain).
    pub fn close(&self) {
        lock(&self.tx).take();
    }

    /// Keeps `sample` as the latest and its chart point, and sends it to every open
    /// stream.
    pub fn publish(&self, sample: &Value) {
        let text: Arc<str> = sample.to_string().into();
        *lock(&self.latest) = Some(text.clone());
        {
            let mut points = lock(&self.points);
            if points.len() == KEEP_POINTS {
                points.pop_front();
            }
            points.push_back(sample["point"].clone());
        }
        if let Some(tx) = lock(&self.tx).as_ref() {
            // No receiver is fine: nobody has the page open.
            let _ = tx.send(text);
        }
    }

    /// The latest sample's JSON text, if one was taken.
    pub fn latest(&self) -> Option<Arc<str>> {
        lock(&self.latest).clone()
    }

    /// The recent chart points, oldest first.
    pub fn points(&self) -> Vec<Value> {
        lock(&self.points).iter().cloned().collect()
    }

    /// A receiver of the samples to come; `None` once closed.
    pub fn subscribe(&self) -> Option<broadcast::Receiver<Arc<str>>> {
        lock(&self.tx).as_ref().map(broadcast::Sender::subscribe)
    }

    /// The dead-letter topic of each consumed topic, users first.
    pub fn dead_letter_topics(&self) -> &[String; 2] {
        &self.dead_letter_topics
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
