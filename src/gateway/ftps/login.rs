//! FTPS logins: libunftp's `Authenticator` and `UserDetailProvider` over the gateway's
//! [`LiveLogins`].
//!
//! Contract:
//! - Password logins only, checked against the logins in force when the attempt is made,
//!   with the constant-time verification of [`crate::gateway::auth`], on a blocking thread
//!   and a bounded number at a time.
//! - A failed attempt is logged at warn (user and reason) and answered only after
//!   [`REJECTION_DELAY`]. The password is never logged or kept.
//! - A successful one opens the user's [`Vfs`] (creating the home directory), records the
//!   user on the session span and the login in the [`SessionContext`] (which the front end
//!   watches for revocation), and logs "Logged in" at info.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;
use unftp_core::auth::{
    AuthenticationError, Authenticator, Credentials, Principal, UserDetailError, UserDetailProvider,
};
use zeroize::Zeroizing;

use crate::gateway::ErrorChain;
use crate::gateway::auth::{LiveLogins, Login};
use crate::gateway::ftps::backend::FtpUser;
use crate::gateway::ftps::engine::SessionContext;
use crate::gateway::vfs::Vfs;
use crate::storage::Volume;

/// How long a refused login waits before it is answered, to slow down guessing.
pub const REJECTION_DELAY: Duration = Duration::from_secs(1);

/// The logins of one FTPS session.
pub struct PasswordLogin {
    logins: LiveLogins,
    volume: Volume,
    password_checks: Arc<Semaphore>,
    context: Arc<SessionContext>,
}

impl fmt::Debug for PasswordLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordLogin")
    }
}

impl PasswordLogin {
    /// Checks passwords against `logins`, at most as many at once as `password_checks`
    /// allows, and opens the user's view of `volume`.
    pub fn new(
        logins: LiveLogins,
        volume: Volume,
        password_checks: Arc<Semaphore>,
        context: Arc<SessionContext>,
    ) -> Self {
        Self {
            logins,
            volume,
            password_checks,
            context,
        }
    }

    async fn password_matches(&self, login: Arc<Login>, password: &str) -> bool {
        let Ok(_permit) = self.password_checks.acquire().await else {
            return false;
        };
        let password = Zeroizing::new(password.as_bytes().to_vec());
        let check = tokio::task::spawn_blocking(move || login.accepts_password(&password));
        check.await.unwrap_or(false)
    }

    async fn refuse(&self, user: &str, reason: &'static str) -> AuthenticationError {
        tracing::warn!(parent: self.context.span(), user, reason, "Login failed");
        tokio::time::sleep(REJECTION_DELAY).await;
        AuthenticationError::BadPassword
    }
}

#[async_trait]
impl Authenticator for PasswordLogin {
    async fn authenticate(
        &self,
        username: &str,
        credentials: &Credentials,
    ) -> Result<Principal, AuthenticationError> {
        let login = self.logins.current().get(username);
        let Some(login) = login.filter(|login| login.has_password()) else {
            return Err(self.refuse(username, "no such password login").await);
        };
        let password = credentials.password.as_deref().unwrap_or_default();
        if !self.password_matches(login.clone(), password).await {
            return Err(self.refuse(username, "wrong password").await);
        }

        self.context.set_login(login);
        Ok(Principal {
            username: username.to_owned(),
        })
    }
}

#[async_trait]
impl UserDetailProvider for PasswordLogin {
    type User = FtpUser;

    async fn provide_user_detail(&self, principal: &Principal) -> Result<FtpUser, UserDetailError> {
        // The login that passed `authenticate` a moment ago, not a fresh lookup: the
        // configuration may have changed in between.
        let login = self
            .context
            .take_login()
            .filter(|login| login.user().name == principal.username)
            .ok_or_else(|| UserDetailError::UserNotFound {
                username: principal.username.clone(),
            })?;

        let user = login.user();
        match Vfs::open(self.volume.clone(), user).await {
            Ok(vfs) => {
                let span = self.context.span();
                span.record("user", user.name.as_str());
                tracing::info!(parent: span, method = "password", "Logged in");
                self.context.set_logged_in(login.clone());
                Ok(FtpUser::new(user.name.clone(), vfs))
            }
            Err(error) => {
                tracing::warn!(
                    parent: self.context.span(),
                    user = %user.name,
                    error = %ErrorChain(&error),
                    "Login refused: home directory unusable"
                );
                Err(UserDetailError::Generic("home directory unusable".into()))
            }
        }
    }
}
