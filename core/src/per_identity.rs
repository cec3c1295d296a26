//! [`PerIdentity`]: a table of per-client values (duplicate memory,
//! latest reports) grouped by [`Identity`], with bounded memory that no
//! identity can take from another.
//!
//! Two levels of LRU ([`hashlink::LruCache`]): identities, least recently
//! active forgotten first once there are [`IdentityLimits::max_identities`];
//! and within each identity its clients, its own least recently active
//! client forgotten first once it holds [`IdentityLimits::clients_per_identity`]
//! (the anonymous identity: [`IdentityLimits::anonymous_clients`]). A
//! certificate holder that invents `client` ids therefore only ever evicts
//! its own entries; to push another identity out it would need more
//! certificates than `max_identities`, each one issued by the CA. Memory is
//! at most `max_identities x clients_per_identity + anonymous_clients`
//! entries.

use hashlink::LruCache;

use crate::identity::Identity;

/// The bounds of a [`PerIdentity`] table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityLimits {
    /// Identities remembered at most (the least recently active is
    /// forgotten first, with all its clients).
    pub max_identities: usize,
    /// Clients remembered per certificate identity at most (its own least
    /// recently active client is forgotten first).
    pub clients_per_identity: usize,
    /// Clients remembered for the anonymous identity at most (every
    /// peer without a certificate shares it).
    pub anonymous_clients: usize,
}

impl IdentityLimits {
    fn cap(&self, identity: &Identity) -> usize {
        if identity.is_anonymous() {
            self.anonymous_clients.max(1)
        } else {
            self.clients_per_identity.max(1)
        }
    }
}

/// Values per `(identity, client)`, bounded as the module documentation says.
#[derive(Debug)]
pub struct PerIdentity<V> {
    limits: IdentityLimits,
    identities: LruCache<Identity, LruCache<String, V>>,
    clients: usize,
}

impl<V> PerIdentity<V> {
    /// An empty table.
    pub fn new(limits: IdentityLimits) -> PerIdentity<V> {
        PerIdentity {
            limits,
            identities: LruCache::new_unbounded(),
            clients: 0,
        }
    }

    /// The value of `(identity, client)`, without touching its age.
    pub fn peek(&self, identity: &str, client: &str) -> Option<&V> {
        self.identities.peek(identity)?.peek(client)
    }

    /// The value of `(identity, client)`, made the most recently active
    /// (and its identity too); created with `new` if missing, forgetting
    /// the least recently active entries as the bounds require.
    pub fn entry(&mut self, identity: &Identity, client: &str, new: impl FnOnce() -> V) -> &mut V {
        if !self.identities.contains_key(identity.as_str()) {
            if self.identities.len() >= self.limits.max_identities.max(1)
                && let Some((_, gone)) = self.identities.remove_lru()
            {
                self.clients -= gone.len();
            }
            self.identities
                .insert(identity.clone(), LruCache::new_unbounded());
        }
        let cap = self.limits.cap(identity);
        let clients = self
            .identities
            .get_mut(identity.as_str())
            .expect("the identity was just inserted");
        if !clients.contains_key(client) {
            if clients.len() >= cap && clients.remove_lru().is_some() {
                self.clients -= 1;
            }
            clients.insert(client.to_owned(), new());
            self.clients += 1;
        }
        clients
            .get_mut(client)
            .expect("the client was just inserted")
    }

    /// The clients of one identity and their values, least recently active
    /// first.
    pub fn clients_of(&self, identity: &str) -> impl Iterator<Item = (&str, &V)> {
        self.identities
            .peek(identity)
            .into_iter()
            .flat_map(|c| c.iter().map(|(k, v)| (k.as_str(), v)))
    }

    /// Every identity, least recently active first.
    pub fn identities(&self) -> impl Iterator<Item = &Identity> {
        self.identities.iter().map(|(k, _)| k)
    }

    /// Clients remembered, over all identities.
    pub fn clients(&self) -> usize {
        self.clients
    }

    /// Identities remembered.
    pub fn identity_count(&self) -> usize {
        self.identities.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> Identity {
        Identity::named(name).expect("valid name")
    }

    #[test]
    fn an_identity_evicts_only_its_own_clients() {
        let mut t = PerIdentity::new(IdentityLimits {
            max_identities: 10,
            clients_per_identity: 3,
            anonymous_clients: 5,
        });
        *t.entry(&id("victim"), "c", || 0) = 1;
        for i in 0..1000 {
            t.entry(&id("attacker"), &format!("fake{i}"), || 0);
        }
        assert_eq!(t.peek("victim", "c"), Some(&1), "the victim is untouched");
        assert_eq!(t.clients_of("attacker").count(), 3);
        assert_eq!(t.clients(), 4);
        for i in 0..10 {
            t.entry(&Identity::anonymous(), &format!("a{i}"), || 0);
        }
        assert_eq!(t.clients_of("").count(), 5);
        assert_eq!(t.clients(), 9);
    }

    #[test]
    fn the_least_recently_active_identity_goes_first() {
        let mut t = PerIdentity::new(IdentityLimits {
            max_identities: 2,
            clients_per_identity: 3,
            anonymous_clients: 3,
        });
        t.entry(&id("a"), "1", || ());
        t.entry(&id("a"), "2", || ());
        t.entry(&id("b"), "1", || ());
        t.entry(&id("a"), "1", || ()); // a is now newer than b
        t.entry(&id("c"), "1", || ()); // forgets b
        assert!(t.peek("b", "1").is_none());
        assert!(t.peek("a", "2").is_some() && t.peek("c", "1").is_some());
        assert_eq!((t.identity_count(), t.clients()), (2, 3));
    }
}
